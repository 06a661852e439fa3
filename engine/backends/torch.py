"""The torch backend: the export.wrappers modules themselves, eager (optionally torch.compile).

It is the reference every other backend is tested against: the ONNX graphs are traces of these same
wrappers. Precision by autocast (fp32: none; fp16/bf16: ``torch.autocast`` on the device). CPU: numpy in,
numpy float32 out. CUDA: torch tensors in (numpy accepted), torch float32 tensors out.

The backend moves the modules it runs to ``config.device`` (it owns them from then on).
"""

from __future__ import annotations

import contextlib
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
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)

    def _wrapper(self, component: str):
        if component not in self._wrappers:
            desc = self.descriptor(component)
            wrapper = desc.wrapper(self._components[desc.source]).eval().to(self.device)
            if self.config.torch_compile:
                import torch

                wrapper = torch.compile(wrapper)
            self._wrappers[component] = wrapper
        return self._wrappers[component]

    def _autocast(self):
        import torch

        dtype = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(self.precision)
        if dtype is None:
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
        with torch.inference_mode(), self._autocast():
            out = self._wrapper(component)(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        result = {}
        for name, value in zip(desc.output_names, out):
            value = value.float()
            result[name] = value.cpu().numpy() if self.device.type == "cpu" else value
        return result
