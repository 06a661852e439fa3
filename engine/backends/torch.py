"""The torch backend: the export.wrappers modules themselves, eager (optionally torch.compile).

It is the reference every other backend is tested against: the ONNX graphs are traces of these same
wrappers. Precision: fp32 runs as is; fp16/bf16 cast each component's weights once (as diffusers'
``.half()``) and run under ``torch.autocast`` (so fp32 feeds meet half weights, and autocast's fp32 ops
stay fp32); a component whose descriptor forbids fp16 (the SDXL VAE, which overflows) stays fp32 in an
fp16 run, as diffusers' ``force_upcast`` does. CPU: numpy in, numpy float32 out. CUDA: torch tensors in
(numpy accepted), torch float32 tensors out. On a CPU without native bf16/fp16 arithmetic
(AVX512-BF16/AMX) the half precisions are emulated and far slower than fp32: the backend says so.

The backend moves the modules it runs to ``config.device`` and casts them to their compute dtype, in place
(it owns them from then on).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Mapping

from engine.backends.base import Array, ComponentsMixin
from engine.config import EngineConfig, Precision

log = logging.getLogger(__name__)


class TorchBackend(ComponentsMixin):
    def __init__(self, config: EngineConfig, components: Mapping[str, Any], model_hash: str | None = None,
                 **options):
        import torch

        self._init_components(components)
        self.config = config
        self.model_hash = model_hash
        self.device = torch.device(config.device)
        self.precision = config.precision
        self._wrappers: dict[str, Any] = {}
        self._patch_keys: dict[str, str] = {}  # source module -> key of the LoRA patch its weights carry
        self._originals: dict[str, dict[str, Any]] = {}  # source -> param -> the unpatched tensor
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        if self.device.type == "cpu" and self.precision != Precision.FP32 and not cpu_has_native_half():
            log.warning("precision %s on this CPU (no AVX512-BF16/AMX) is emulated and much slower than fp32 "
                        "(a 3x3 conv measured ~100x); use precision fp32 on CPU", self.precision.value)

    def _dtype(self, component: str):
        """The compute dtype of ``component``: the engine's precision, except fp32 for fp16-unsafe ones."""
        import torch

        if self.precision == Precision.FP16 and not self.descriptor(component).fp16:
            return torch.float32
        return {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(self.precision, torch.float32)

    def _wrapper(self, component: str):
        if component not in self._wrappers:
            desc = self.descriptor(component)
            dtype = self._dtype(component)
            module = self._components[desc.source]
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)  # once, in place (the backend owns its modules; no second copy)
            wrapper = desc.wrapper(module).eval().to(self.device)
            if self.config.torch_compile:
                import torch

                wrapper = torch.compile(wrapper)
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

        from engine.networks.lora import SOURCES, apply_delta

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
            self._patch_keys[source] = key
            log.info("%s: LoRA patch %s (%d weights)", source, key or "removed", len(touched))

    def _autocast(self, component: str):
        import torch

        dtype = self._dtype(component)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _tensor(self, value, dtype: str):
        import torch

        return torch.as_tensor(value, device=self.device).to(getattr(torch, dtype))

    def run(self, component: str, feeds: Mapping[str, Array]) -> dict[str, Array]:
        import torch

        desc = self.descriptor(component)
        self._check_feeds(desc, feeds)
        args = [self._tensor(feeds[spec.name], spec.dtype) for spec in desc.inputs]
        with torch.inference_mode(), self._autocast(component):
            out = self._wrapper(component)(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        result = {}
        for name, value in zip(desc.output_names, out):
            value = value.float()
            result[name] = value.cpu().numpy() if self.device.type == "cpu" else value
        return result


@functools.cache
def cpu_has_native_half() -> bool:
    """Whether this CPU has bf16/fp16 arithmetic (AVX512-BF16, AVX512-FP16 or AMX); Linux /proc/cpuinfo."""
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"))
