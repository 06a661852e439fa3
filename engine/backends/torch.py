"""The torch backend: the export.wrappers modules themselves, eager or compiled (``torch.compile``).

It is the reference every other backend is tested against: the ONNX graphs are traces of these same
wrappers. CPU: numpy in, numpy float32 out. CUDA: torch tensors in (numpy accepted), torch float32 tensors out.

Precision (``config.precision``), resolved per device once (:func:`compute_dtype`):

- fp32 runs as is.
- CUDA: fp16 / bf16 as asked.
- CPU: half precision means bf16 where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16, read
  from /proc/cpuinfo at run time; torch bf16 then runs ~1.5-2x fp32 on convs/matmuls), fp16 included (torch's
  CPU fp16 kernels are slower than its bf16 ones). Without native bf16 a half precision would be emulated
  (~100x slower on a 3x3 conv): the backend runs fp32 instead and logs a warning.

Weights are cast once, in place (the backend owns the modules it is handed; no second copy). A component whose
descriptor forbids fp16 (the SDXL VAE, which overflows) stays fp32 in an fp16 run, as diffusers'
``force_upcast`` does. :class:`TorchOptions` holds the speed settings; their defaults depend on the device:

- ``autocast``: run half components under ``torch.autocast`` (fp32 feeds meet half weights; autocast keeps
  norms/softmax in fp32). Default on CPU. On CUDA the default is diffusers' way: float feeds are cast to the
  component's dtype (``timestep`` and ``time_ids`` stay fp32: the modules cast their embeddings themselves) and
  no autocast dispatch runs per op.
- ``channels_last``: conv-heavy modules (UNet, ControlNet, VAE) and their 4-D feeds in NHWC. Default on CUDA
  (cuDNN's fp16 convs are NHWC kernels).
- ``sdpa``: diffusers' ``AttnProcessor2_0`` (``scaled_dot_product_attention``: flash / memory-efficient
  kernels on CUDA). Default everywhere.
- ``fuse_qkv``: diffusers' ``fuse_qkv_projections`` (one QKV matmul for self-attention, one KV matmul for
  cross-attention; the unfused weights stay, so the ONNX export of the same modules is unchanged). Default on
  CUDA.
- ``compile``: ``torch.compile`` (inductor) of the conv-heavy components with ``dynamic=False``, i.e. one
  compiled graph per static input shape (recompiled on a new shape, up to torch's cache limit); mode
  "reduce-overhead" (CUDA graphs) on CUDA, the default mode on CPU. ``config.torch_compile`` turns it on.
  Outputs of a CUDA-graph run are copied before they are returned (the next replay overwrites them).
- ``vae_tiling``: diffusers' tiled VAE decode (large images in bounded memory; seams are blended, so the
  output differs slightly from the untiled decode). Off by default.

Attention hooks (sd-webui-controlnet's reference units, engine.controlnet.reference):
:meth:`TorchBackend.self_attention_layers` lists the UNet's self-attention layers and
:meth:`TorchBackend.attention_processors` installs processors on them for a block; while they are installed the
UNet components run eagerly (a compiled graph would not follow the processors' Python state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Mapping

from engine.backends.base import Array, ComponentsMixin
from engine.config import EngineConfig, Precision
from core.cpu import native_bf16 as cpu_has_native_bf16  # the one probe (AVX512-BF16 or AMX-BF16)
from core.errors import InvalidRequest
from core.lazy import load, require
from engine.networks.lora import SOURCES, apply_delta

log = logging.getLogger(__name__)

# components whose modules are conv-heavy (channels_last, torch.compile)
CONV_COMPONENTS = ("unet", "unet_control", "controlnet", "vae_decoder", "vae_encoder")
# feeds that stay fp32 in a pure-half run: the modules build their sinusoidal embeddings from them in fp32
FP32_FEEDS = ("timestep", "time_ids", "clip_skip")


@dataclasses.dataclass(frozen=True)
class TorchOptions:
    """Speed settings of the torch backend (see the module docstring); :meth:`for_device` gives the defaults."""

    autocast: bool = True
    channels_last: bool = False
    sdpa: bool = True
    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_components: tuple[str, ...] = CONV_COMPONENTS
    vae_tiling: bool = False

    @classmethod
    def for_device(cls, device: str, compile: bool = False, **overrides) -> "TorchOptions":
        cuda = str(device).startswith("cuda")
        base = dict(autocast=not cuda, channels_last=cuda, fuse_qkv=cuda, compile=compile,
                    compile_mode="reduce-overhead" if cuda else None)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in names:
                raise InvalidRequest(f"torch_options.{key}", "unknown option", ", ".join(sorted(names)))
        base.update(overrides)
        return cls(**base)


def compute_dtype(precision: Precision, device: str, native_bf16: bool | None = None):
    """The torch dtype a half-safe component runs in for ``precision`` on ``device`` (see the module docstring)."""
    import torch

    if precision == Precision.FP32:
        return torch.float32
    if str(device).startswith("cuda"):
        return torch.float16 if precision == Precision.FP16 else torch.bfloat16
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    return torch.bfloat16 if native else torch.float32


class TorchBackend(ComponentsMixin):
    def __init__(self, config: EngineConfig, components: Mapping[str, Any], model_hash: str | None = None,
                 *, torch_options: TorchOptions | Mapping[str, Any] | None = None, progress=None):
        import torch

        self._init_components(components)
        self.config = config
        self.model_hash = model_hash
        self.device = torch.device(config.device)
        self.precision = config.precision
        if isinstance(torch_options, TorchOptions):
            self.options = torch_options
        else:
            self.options = TorchOptions.for_device(config.device, compile=config.torch_compile,
                                                   **dict(torch_options or {}))
        self.half_dtype = compute_dtype(self.precision, config.device)
        self._wrappers: dict[str, Any] = {}
        self._patch_keys: dict[str, str] = {}  # source module -> key of the LoRA patch its weights carry
        self._originals: dict[str, dict[str, Any]] = {}  # source -> param -> the unpatched tensor
        self._prepared: set[str] = set()  # source modules already cast/moved/fused
        self._hooked = 0  # attention_processors blocks open: the UNet components run eagerly
        self._eager: dict[str, Any] = {}  # uncompiled wrappers of compiled components
        self._tome = 0.0  # the token merging ratio tomesd's patch on the UNet carries (0: none)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        if self.device.type == "cpu" and self.precision != Precision.FP32:
            if self.half_dtype == torch.float32:
                log.warning("precision %s: this CPU has no native bf16 (AVX512-BF16/AMX), where half precision is "
                            "emulated and much slower (a 3x3 conv measured ~100x): running fp32",
                            self.precision.value)
            elif self.precision == Precision.FP16:
                log.info("precision fp16 on CPU runs as bf16 (this CPU has native bf16; torch's CPU fp16 is slower)")

    # -- preparation ----------------------------------------------------------------------------------------
    def _dtype(self, component: str):
        """The compute dtype of ``component``: the resolved half dtype, except fp32 for fp16-unsafe ones."""
        import torch

        if self.half_dtype == torch.float16 and not self.descriptor(component).fp16:
            return torch.float32
        return self.half_dtype

    def dtype_of(self, component: str) -> str:
        """The compute dtype of ``component`` as a string ("float16", "bfloat16", "float32")."""
        return str(self._dtype(component)).replace("torch.", "")

    def _prepare_module(self, component: str, module) -> None:
        """Cast, move and optimise one source module, once (it may serve several components)."""
        import torch

        desc = self.descriptor(component)
        if desc.source in self._prepared:
            return
        opts = self.options
        dtype = self._dtype(component)
        if opts.sdpa and hasattr(module, "set_attn_processor") and not opts.fuse_qkv:
            AttnProcessor2_0 = load("diffusers.models.attention_processor", "AttnProcessor2_0")

            _set_processor(module, AttnProcessor2_0)
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)  # once, in place (the backend owns its modules; no second copy)
        module.to(self.device)
        if opts.fuse_qkv and hasattr(module, "fuse_qkv_projections"):
            try:
                module.fuse_qkv_projections()
            except (ValueError, AttributeError) as exc:  # e.g. added KV projections
                log.info("%s: no fused QKV (%s)", desc.source, exc)
        if opts.channels_last and component in CONV_COMPONENTS:
            module.to(memory_format=torch.channels_last)
        if opts.vae_tiling and hasattr(module, "enable_tiling") and component.startswith("vae"):
            module.enable_tiling()
        self._prepared.add(desc.source)

    def _wrapper(self, component: str):
        if component not in self._wrappers:
            desc = self.descriptor(component)
            module = self._components[desc.source]
            self._prepare_module(component, module)
            wrapper = desc.wrapper(module).eval().to(self.device)
            if self.options.compile and component in self.options.compile_components:
                import torch

                log.info("%s: torch.compile (mode %s, one graph per static shape)", component,
                         self.options.compile_mode or "default")
                wrapper = torch.compile(wrapper, mode=self.options.compile_mode, dynamic=False)
            self._wrappers[component] = wrapper
        return self._wrappers[component]

    def set_patch(self, patch) -> None:
        """Carry the weights of ``patch`` (an engine.networks.lora.WeightPatch; EMPTY: none).

        In place: each touched parameter becomes ``apply_delta(original, delta)`` in its compute dtype, and the
        original tensors of touched parameters are kept, so a change of set first restores them exactly
        (switching sets never drifts: equal sets give bit-identical weights). Sources whose patch key is
        unchanged are not touched.
        """
        import torch

        for source in SOURCES:
            key = patch.key(source)
            if source not in self._components or self._patch_keys.get(source, "") == key:
                continue
            self._wrapper(source)  # cast and move the module first: the patch is applied in the compute dtype
            module = self._components[source]
            originals = self._originals.setdefault(source, {})
            with torch.no_grad():
                for name, original in originals.items():
                    module.get_parameter(name).copy_(original)
                touched = set()
                for name, delta in patch.deltas(source):
                    param = module.get_parameter(name)
                    if name not in originals:
                        originals[name] = param.detach().clone()
                    param.copy_(apply_delta(originals[name], delta.to(param.device)))
                    touched.add(name)
                for name in [n for n in originals if n not in touched]:
                    del originals[name]  # restored above: the parameter is its original again
                if self.options.fuse_qkv and hasattr(module, "fuse_qkv_projections"):
                    # the fused QKV weights are copies of to_q/to_k/to_v: rebuild them from the patched ones
                    try:
                        module.unfuse_qkv_projections()
                        module.fuse_qkv_projections()
                    except Exception as exc:  # noqa: BLE001 - as _prepare_module: a model without fusable attention
                        log.info("%s: no fused QKV (%s)", source, exc)
            self._patch_keys[source] = key
            log.info("%s: LoRA patch %s (%d weights)", source, key or "removed", len(touched))

    def set_token_merging(self, ratio: float) -> None:
        """The webui's token merging (``sd_models.apply_token_merging``): tomesd's patch on the UNet at ``ratio``
        with the webui's arguments (no random partition, self-attention only; sx = sy = 2, max_downsample 1:
        the highest-resolution blocks), removed at 0; nothing is done when the ratio carried is ``ratio``."""
        ratio = float(ratio)
        if ratio == self._tome or not self.has("unet"):
            return
        tomesd = require("tomesd", "tome", "token merging (token_merging_ratio)")
        self._wrapper("unet")  # cast and move the module first
        unet = self._components[self.descriptor("unet").source]
        if self._tome:
            tomesd.remove_patch(unet)
        if ratio:
            tomesd.apply_patch(unet, ratio=ratio, use_rand=False, merge_attn=True, merge_crossattn=False,
                               merge_mlp=False)
        log.info("unet: token merging ratio %s", ratio or "off")
        self._tome = ratio

    # -- attention hooks ------------------------------------------------------------------------------------
    def self_attention_layers(self, component: str = "unet") -> list[tuple[Any, int]]:
        """``(attention module, channels)`` of every self-attention layer (attn1 of a transformer block that is not
        cross-attention only) of the UNet, in the order of the webui's UNet: down blocks, middle block, up blocks."""
        from diffusers.models.attention import BasicTransformerBlock

        self._wrapper(component)  # cast and move the module first
        unet = self._components[self.descriptor(component).source]
        parts = [getattr(unet, name, None) for name in ("down_blocks", "mid_block", "up_blocks")]
        layers = []
        for part in parts:
            if part is None:
                continue
            for module in part.modules():
                if isinstance(module, BasicTransformerBlock) and not getattr(module, "only_cross_attention", False):
                    norm = getattr(module.norm1, "normalized_shape", None)
                    channels = int(norm[0]) if norm else int(module.attn1.query_dim)
                    layers.append((module.attn1, channels))
        return layers

    @contextlib.contextmanager
    def attention_processors(self, processors: Mapping[Any, Any]):
        """Within the block, each attention module of ``processors`` (from :meth:`self_attention_layers`) runs its
        processor; the previous ones are restored after it."""
        previous = {attn: attn.processor for attn in processors}
        for attn, processor in processors.items():
            attn.processor = processor  # as Attention.set_processor sets a processor that is not a module
        self._hooked += 1
        try:
            yield
        finally:
            self._hooked -= 1
            for attn, processor in previous.items():
                attn.processor = processor

    def _runner(self, component: str):
        """The module ``run`` calls: the (maybe compiled) wrapper, or its eager twin while hooks are installed."""
        wrapper = self._wrapper(component)
        if not self._hooked or not self.options.compile or component not in self.options.compile_components:
            return wrapper
        if component not in self._eager:
            desc = self.descriptor(component)
            self._eager[component] = desc.wrapper(self._components[desc.source]).eval().to(self.device)
        return self._eager[component]

    @property
    def _cuda_graphs(self) -> bool:
        return (self.device.type == "cuda" and self.options.compile
                and self.options.compile_mode in ("reduce-overhead", "max-autotune"))

    def _autocast(self, component: str):
        import torch

        dtype = self._dtype(component)
        if dtype == torch.float32 or not self.options.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _feed(self, value, spec, component: str):
        import torch

        t = torch.as_tensor(value, device=self.device)
        if spec.dtype != "float32":
            return t.to(getattr(torch, spec.dtype))
        dtype = torch.float32
        if not self.options.autocast and spec.name not in FP32_FEEDS:
            dtype = self._dtype(component)  # pure half: the feeds meet the weights in their dtype
        t = t.to(dtype)
        if self.options.channels_last and t.ndim == 4 and component in CONV_COMPONENTS:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    # -- running --------------------------------------------------------------------------------------------
    def run(self, component: str, feeds: Mapping[str, Array]) -> dict[str, Array]:
        import torch

        desc = self.descriptor(component)
        self._check_feeds(desc, feeds)
        wrapper = self._runner(component)
        args = [self._feed(feeds[spec.name], spec, component) for spec in desc.inputs]
        graphs = self._cuda_graphs and component in self.options.compile_components and not self._hooked
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(), self._autocast(component):
            out = wrapper(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        result = {}
        for name, value in zip(desc.output_names, out):
            value = value.float()
            if graphs:
                value = value.clone()  # the next CUDA-graph replay overwrites its outputs
            result[name] = value.cpu().numpy() if self.device.type == "cpu" else value.contiguous()
        return result


def _set_processor(module, cls) -> None:
    """Set ``cls()`` as the attention processor of every attention layer that uses a plain processor."""
    procs = module.attn_processors
    if all(type(p).__name__ in ("AttnProcessor", "AttnProcessor2_0") for p in procs.values()):
        module.set_attn_processor(cls())
