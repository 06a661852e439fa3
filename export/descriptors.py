"""Component descriptors: what one exported component takes and gives, built from the diffusers configs.

A :class:`ComponentDescriptor` names a component's inputs and outputs (exactly those of
:mod:`export.wrappers`), their dtypes and symbolic shapes, the dynamic axes, sample inputs for tracing and
min/opt/max shape profiles. The same descriptor drives the ONNX export, the fp16 policy, the TensorRT
builds and the backends' buffers, so a component's interface is written down once.

Shapes are tuples of ints and symbolic expressions over four symbols, evaluated by :func:`eval_dim`:

``B``  batch; ``h``/``w`` latent height/width; ``T`` tokens (77*k); ``E`` extra token-embedding rows. Expressions: ``"h"``, ``"h/4"``
(a ControlNet residual at 1/4 of the latent), ``"8*h"`` (pixels of an x8 VAE).

Every number comes from the module configs (block counts, channels, projection sizes), never from a
model name; :data:`COMPONENTS` is the registry of component name -> (source module key, builder).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from core.deferred import has_attribute
from core.errors import InvalidRequest
from core.tokens import TOKENS_PER_CHUNK

SYMBOLS = ("B", "h", "w", "T", "E")
_DIM = re.compile(r"^(?:(\d+)\*)?([BhwTE])(?:/(\d+))?$")
# extra token-embedding rows (textual inversion) a TensorRT profile supports: min, opt, max
EXTRA_ROWS = (1, 8, 640)

Shape = tuple  # of int | str


def eval_dim(dim: int | str, env: Mapping[str, int]) -> int:
    """Value of one shape entry: an int, or ``[k*]S[/d]`` with S in ``B h w T`` looked up in ``env``."""
    if isinstance(dim, int):
        return dim
    m = _DIM.match(dim)
    if not m:
        raise ValueError(f"bad shape expression {dim!r}")
    mul, sym, div = m.groups()
    value = env[sym] * int(mul or 1)
    if div:
        if value % int(div):
            raise ValueError(f"{sym}={env[sym]} is not divisible as {dim!r} requires")
        value //= int(div)
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``value_range`` is what sample inputs are drawn from (ints: [lo, hi))."""

    name: str
    shape: Shape
    dtype: str = "float32"
    value_range: tuple[float, float] = (-1.0, 1.0)

    def resolve(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ShapeConfig:
    """Ranges a build must support: ``(min, opt, max)`` of batch, image side in pixels and 77-token chunks."""

    batch: tuple[int, int, int] = (1, 2, 4)
    image: tuple[int, int, int] = (256, 512, 1024)
    token_chunks: tuple[int, int, int] = (1, 1, 3)

    def __post_init__(self):
        for name in ("batch", "image", "token_chunks"):
            lo, opt, hi = getattr(self, name)
            if not (1 <= lo <= opt <= hi):
                raise InvalidRequest(f"shape_config.{name}", f"need 1 <= min <= opt <= max, got {(lo, opt, hi)}")

    @property
    def key(self) -> str:
        """Short stable name of the ranges, used in artefact paths."""
        b, i, t = self.batch, self.image, self.token_chunks
        return f"b{b[0]}-{b[1]}-{b[2]}_i{i[0]}-{i[1]}-{i[2]}_t{t[0]}-{t[1]}-{t[2]}"


@dataclass(frozen=True)
class ComponentDescriptor:
    """The interface of one component (see the module docstring for the shape language).

    ``latent_multiple``: latent h/w must be multiples of it (the UNet's total downscale).
    ``image_scale``: pixels per latent (the VAE factor). ``optimizer_type``: onnxruntime transformer optimizer
    ``model_type``. ``fp16``: whether an fp16 build is allowed (False keeps the component fp32 by policy).
    ``fp16_keep_fp32_ops``: op types kept fp32 in an fp16 build (they overflow in fp16).
    """

    component: str
    source: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latent_multiple: int = 1
    image_scale: int = 8
    optimizer_type: str = "unet"
    fp16: bool = True
    fp16_keep_fp32_ops: tuple[str, ...] = ()
    make_wrapper: Callable[[Any], Any] = field(default=None, repr=False, compare=False)
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def uses_tokens(self) -> bool:
        return any("T" in str(d) for t in self.inputs for d in t.shape)

    @property
    def uses_latent(self) -> bool:
        return any(re.search("[hw]", str(d)) for t in self.inputs for d in t.shape)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export`` dynamic_axes for every input and output."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def env(self, batch: int = 1, height: int | None = None, width: int | None = None, tokens: int = 77) -> dict:
        """Symbol values; ``height``/``width`` are latent sizes (default: the smallest valid one >= 8)."""
        m = self.latent_multiple
        height = height if height is not None else m * math.ceil(8 / m)
        width = width if width is not None else height
        for name, value in (("height", height), ("width", width)):
            if value < 1 or value % m:
                raise InvalidRequest(name, f"latent {name} {value} is not a positive multiple of {m}",
                                     f"multiples of {m} (images of multiples of {m * self.image_scale} px)")
        if tokens < 1 or tokens % TOKENS_PER_CHUNK:
            raise InvalidRequest("tokens", f"{tokens} tokens", f"multiples of {TOKENS_PER_CHUNK}")
        return {"B": batch, "h": height, "w": width, "T": tokens, "E": 2}

    def output_shapes(self, env: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(env) for t in self.outputs}

    def env_from_inputs(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Recover the symbol values from concrete input shapes (for output buffers of a backend)."""
        env: dict[str, int] = {}
        for spec in self.inputs:
            shape = tuple(shapes[spec.name])
            if len(shape) != len(spec.shape):
                raise InvalidRequest(spec.name, f"rank {len(shape)}", f"shape {spec.shape}")
            for d, v in zip(spec.shape, shape):
                if isinstance(d, str):
                    mul, sym, div = _DIM.match(d).groups()
                    env.setdefault(sym, v * int(div or 1) // int(mul or 1))
        env.setdefault("T", TOKENS_PER_CHUNK)
        return env

    def sample_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None,
                      tokens: int = 77, seed: int = 0) -> dict:
        """Deterministic random torch tensors for tracing and parity tests."""
        import torch

        g = torch.Generator().manual_seed(seed)
        env = self.env(batch, height, width, tokens)
        feeds = {}
        for spec in self.inputs:
            shape = spec.resolve(env)
            lo, hi = spec.value_range
            if spec.dtype == "int64":
                feeds[spec.name] = torch.randint(int(lo), int(hi), shape, generator=g, dtype=torch.int64)
            else:
                feeds[spec.name] = torch.rand(shape, generator=g) * (hi - lo) + lo
        return feeds

    def latent_range(self, shapes: ShapeConfig) -> tuple[int, int, int]:
        """(min, opt, max) latent side for the image range, rounded inwards to ``latent_multiple``."""
        m, s = self.latent_multiple, self.image_scale
        lo, opt, hi = (px / s for px in shapes.image)
        lo_l = max(m, m * math.ceil(lo / m))
        hi_l = m * math.floor(hi / m)
        opt_l = min(max(lo_l, m * round(opt / m)), hi_l)
        if hi_l < lo_l:
            raise InvalidRequest("shape_config.image", f"no latent multiple of {m} in {shapes.image} px")
        return lo_l, opt_l, hi_l

    def profile(self, shapes: ShapeConfig) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) shapes, for TensorRT optimisation profiles."""
        lat = self.latent_range(shapes)
        envs = [
            {"B": shapes.batch[i], "h": lat[i], "w": lat[i], "T": TOKENS_PER_CHUNK * shapes.token_chunks[i],
             "E": EXTRA_ROWS[i]}
            for i in range(3)
        ]
        return {t.name: tuple(t.resolve(e) for e in envs) for t in self.inputs}

    def wrapper(self, module):
        """The torch module of :mod:`export.wrappers` that computes this component from its source module."""
        return self.make_wrapper(module)


# ---------------------------------------------------------------------------------------------------------
# builders: one per component, from the diffusers / transformers configs


def _cfg(module) -> Any:
    return module.config


def _lpb(cfg, i: int) -> int:
    lpb = cfg.layers_per_block
    return lpb[i] if isinstance(lpb, (list, tuple)) else lpb


def residual_specs(cfg) -> list[TensorSpec]:
    """The ControlNet residuals of a UNet/ControlNet config: (channels, downscale) as diffusers produces them."""
    channels = list(cfg.block_out_channels)
    specs = [(channels[0], 1)]  # conv_in
    n = len(channels)
    for i, ch in enumerate(channels):
        specs += [(ch, 2 ** i)] * _lpb(cfg, i)
        if i < n - 1:
            specs.append((ch, 2 ** (i + 1)))
    out = [
        TensorSpec(f"down_residual_{k}", ("B", ch, _scaled("h", d), _scaled("w", d)))
        for k, (ch, d) in enumerate(specs)
    ]
    mid = 2 ** (n - 1)
    out.append(TensorSpec("mid_residual", ("B", channels[-1], _scaled("h", mid), _scaled("w", mid))))
    return out


def _scaled(sym: str, div: int) -> str:
    return sym if div == 1 else f"{sym}/{div}"


def _is_text_time(cfg) -> bool:
    return getattr(cfg, "addition_embed_type", None) == "text_time"


def _unet_inputs(cfg) -> list[TensorSpec]:
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    specs = [
        TensorSpec("sample", ("B", cfg.in_channels, "h", "w")),
        TensorSpec("timestep", ("B",), value_range=(0.0, 999.0)),
        TensorSpec("encoder_hidden_states", ("B", "T", cross)),
    ]
    if _is_text_time(cfg):
        n = time_id_count(cfg)
        pooled = cfg.projection_class_embeddings_input_dim - n * cfg.addition_time_embed_dim
        specs += [
            TensorSpec("text_embeds", ("B", pooled)),
            TensorSpec("time_ids", ("B", n), value_range=(0.0, 1024.0)),
        ]
    return specs


def time_id_count(cfg) -> int:
    """The time ids a text_time UNet takes: 6 for SDXL (original size, crop, target size), 5 for the SDXL
    refiner (original size, crop, aesthetic score). The UNet config does not say it; the refiner's layout does:
    its context is its one text encoder's hidden states, as wide as its pooled (projected) output, so
    ``projection_class_embeddings_input_dim - 5 * addition_time_embed_dim == cross_attention_dim`` (1280 + 5 x 256
    = 2560 for the real refiner; SDXL's 2816 - 5 x 256 = 1536 is not its 2048)."""
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    return 5 if cfg.projection_class_embeddings_input_dim - 5 * cfg.addition_time_embed_dim == cross else 6


def _downscale(cfg) -> int:
    return 2 ** (len(cfg.block_out_channels) - 1)


def _unet(modules, control: bool) -> ComponentDescriptor:
    from export.wrappers import UNetWrapper

    unet = modules["unet"]
    cfg = _cfg(unet)
    inputs = _unet_inputs(cfg)
    if control:
        inputs += residual_specs(cfg)
    return ComponentDescriptor(
        component="unet_control" if control else "unet",
        source="unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("model_output", ("B", cfg.out_channels, "h", "w")),),
        latent_multiple=_downscale(cfg),
        image_scale=_vae_scale(modules.get("vae")),
        optimizer_type="unet",
        make_wrapper=lambda m: UNetWrapper(m, with_residuals=control),
        config=dict(cfg),
    )


def _controlnet(modules) -> ComponentDescriptor:
    from export.wrappers import ControlNetWrapper

    cn = modules["controlnet"]
    cfg = _cfg(cn)
    emb = getattr(cfg, "conditioning_embedding_out_channels", (16, 32, 96, 256))
    cond_scale = 2 ** (len(emb) - 1)
    inputs = _unet_inputs(cfg)
    inputs.insert(3, TensorSpec("controlnet_cond", ("B", cfg.conditioning_channels,
                                                    f"{cond_scale}*h", f"{cond_scale}*w"), value_range=(0.0, 1.0)))
    return ComponentDescriptor(
        component="controlnet",
        source="controlnet",
        inputs=tuple(inputs),
        outputs=tuple(residual_specs(cfg)),
        latent_multiple=_downscale(cfg),
        image_scale=cond_scale,
        optimizer_type="unet",
        make_wrapper=ControlNetWrapper,
        config=dict(cfg),
    )


def _vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def _vae_fp16_ok(modules) -> bool:
    """SDXL-family VAEs that diffusers marks ``force_upcast`` overflow in fp16: their decoder stays fp32.

    The family is recognised by structure (a text_time UNet or a second text encoder), not by name; an
    fp16-fixed SDXL VAE (``force_upcast: false``) may run in fp16.
    """
    unet = modules.get("unet")
    sdxl = (unet is not None and _is_text_time(unet.config)) or "text_encoder_2" in modules
    return not (sdxl and bool(getattr(modules["vae"].config, "force_upcast", True)))


def _vae_decoder(modules) -> ComponentDescriptor:
    from export.wrappers import VaeDecoderWrapper

    vae = modules["vae"]
    cfg, s = vae.config, _vae_scale(vae)
    return ComponentDescriptor(
        component="vae_decoder",
        source="vae",
        inputs=(TensorSpec("latent", ("B", cfg.latent_channels, "h", "w"), value_range=(-3.0, 3.0)),),
        outputs=(TensorSpec("image", ("B", cfg.out_channels, f"{s}*h", f"{s}*w")),),
        latent_multiple=1,
        image_scale=s,
        optimizer_type="vae",
        fp16=_vae_fp16_ok(modules),
        make_wrapper=VaeDecoderWrapper,
        config=dict(cfg),
    )


def _vae_encoder(modules) -> ComponentDescriptor:
    from export.wrappers import VaeEncoderWrapper

    vae = modules["vae"]
    cfg, s = vae.config, _vae_scale(vae)
    return ComponentDescriptor(
        component="vae_encoder",
        source="vae",
        inputs=(TensorSpec("image", ("B", cfg.in_channels, f"{s}*h", f"{s}*w"), value_range=(0.0, 1.0)),),
        outputs=(TensorSpec("latent", ("B", cfg.latent_channels, "h", "w")),),
        latent_multiple=1,
        image_scale=s,
        optimizer_type="vae",
        fp16=_vae_fp16_ok(modules),
        make_wrapper=VaeEncoderWrapper,
        config=dict(cfg),
    )


def _taesd(modules, part: str) -> ComponentDescriptor:
    """TAESD / TAESDXL (a bare nn.Sequential of 3x3 convs, engine.models.taesd_nets): the VAE components' contract,
    8x, fp16-safe (its decoder starts with a tanh clamp)."""
    from export.wrappers import TaesdDecoderWrapper, TaesdEncoderWrapper

    module = modules[f"taesd_{part}"]
    convs = [m for m in module.modules() if type(m).__name__ == "Conv2d"]
    latent = convs[0].in_channels if part == "decoder" else convs[-1].out_channels
    latent_spec = TensorSpec("latent", ("B", latent, "h", "w"), value_range=(-3.0, 3.0))
    image_spec = TensorSpec("image", ("B", 3, "8*h", "8*w"), value_range=(0.0, 1.0))
    return ComponentDescriptor(
        component=f"taesd_{part}",
        source=f"taesd_{part}",
        inputs=(latent_spec,) if part == "decoder" else (image_spec,),
        outputs=(image_spec,) if part == "decoder" else (latent_spec,),
        latent_multiple=1,
        image_scale=8,
        optimizer_type="vae",
        make_wrapper=TaesdDecoderWrapper if part == "decoder" else TaesdEncoderWrapper,
        config={"latent_channels": latent},
    )


def _text_encoder(modules, key: str) -> ComponentDescriptor:
    from export.wrappers import TextEncoderWrapper

    te = modules[key]
    cfg = te.config
    pooled = cfg.projection_dim if has_attribute(te, "text_projection") else cfg.hidden_size
    tokens = cfg.max_position_embeddings
    return ComponentDescriptor(
        component=key,
        source=key,
        inputs=(
            TensorSpec("input_ids", ("B", tokens), "int64", (0, cfg.vocab_size)),
            # webui clip skip N: 1 = last layer; at most the number of layers
            TensorSpec("clip_skip", (1,), "int64", (1, 2)),
            # textual-inversion vectors: input_ids >= vocab_size index these rows
            TensorSpec("extra_embeddings", ("E", cfg.hidden_size)),
        ),
        outputs=(
            TensorSpec("hidden_state", ("B", tokens, cfg.hidden_size)),
            TensorSpec("hidden_state_raw", ("B", tokens, cfg.hidden_size)),
            TensorSpec("pooled", ("B", pooled)),
        ),
        optimizer_type="clip",
        make_wrapper=TextEncoderWrapper,
        config=cfg.to_dict(),
    )


# component -> builder(modules). The source module key of each is the descriptor's ``source``.
COMPONENTS: dict[str, Callable[[Mapping[str, Any]], ComponentDescriptor]] = {
    "text_encoder": lambda m: _text_encoder(m, "text_encoder"),
    "text_encoder_2": lambda m: _text_encoder(m, "text_encoder_2"),
    "unet": lambda m: _unet(m, control=False),
    "unet_control": lambda m: _unet(m, control=True),
    "controlnet": _controlnet,
    "vae_decoder": _vae_decoder,
    "vae_encoder": _vae_encoder,
    "taesd_decoder": lambda m: _taesd(m, "decoder"),
    "taesd_encoder": lambda m: _taesd(m, "encoder"),
}

# the module key each component is computed from
SOURCES = {
    "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "unet_control": "unet",
    "controlnet": "controlnet", "vae_decoder": "vae", "vae_encoder": "vae",
    "taesd_decoder": "taesd_decoder", "taesd_encoder": "taesd_encoder",
}

# seamless tiling (the webui's ``tiling``): every Conv2d of the UNet and the VAE pads circularly. Its own
# components (own graphs and artefacts, exported on first use only: never a sibling of the plain ones)
SEAMLESS = {c: f"{c}_seamless" for c in ("unet", "unet_control", "vae_decoder", "vae_encoder")}


def _seamless(base: str) -> Callable[[Mapping[str, Any]], ComponentDescriptor]:
    def build(modules) -> ComponentDescriptor:
        from export.wrappers import CircularPadding

        desc = COMPONENTS[base](modules)
        return replace(desc, component=SEAMLESS[base],
                       make_wrapper=lambda m, make=desc.make_wrapper: CircularPadding(make(m)))

    return build


for _base, _name in SEAMLESS.items():
    COMPONENTS[_name] = _seamless(_base)
    SOURCES[_name] = SOURCES[_base]
# components made on demand only: not exported with their siblings, not needed for a load from cache
VARIANTS = frozenset(SEAMLESS.values())


def source_of(component: str) -> str | None:
    """The module key ``component`` is computed from (an IP-Adapter variant's: its base's, export.ip_adapter)."""
    return SOURCES.get(component.partition("+ip:")[0])


def on_demand(component: str) -> bool:
    """Whether ``component`` is made on first use only: a seamless or an IP-Adapter variant."""
    return component in VARIANTS or "+ip:" in component


def available_components(modules: Mapping[str, Any]) -> list[str]:
    """Components computable from ``modules`` (a diffusers components dict), in registry order."""
    return [c for c in COMPONENTS if SOURCES[c] in modules and c not in VARIANTS]


def describe(component: str, modules: Mapping[str, Any]) -> ComponentDescriptor:
    """The descriptor of ``component`` for the modules of one model (``LoadedModel.components``)."""
    if "+ip:" in component:  # an IP-Adapter variant of a UNet component (export.ip_adapter)
        from export.ip_adapter import describe_variant

        return describe_variant(component, modules, describe)
    if component not in COMPONENTS:
        raise InvalidRequest("component", f"unknown component {component!r}", ", ".join(COMPONENTS))
    if SOURCES[component] not in modules:
        raise InvalidRequest("component", f"this model has no {SOURCES[component]!r} module for {component!r}",
                             ", ".join(available_components(modules)))
    return COMPONENTS[component](modules)
