"""The TensorRT backend: one engine per component, built lazily from the component's ONNX export.

NOT RUN IN CI: TensorRT cannot be installed in this project's environment. This module and
export/tensorrt.py are written against TensorRT 10's documented Python API; the tests cover everything up
to that boundary (the MissingDependency / BackendUnavailable errors, profiles, cache keys, ONNX preparation,
profile range checks). See export/tensorrt.py.

Flow per component, on first ``run``: export.onnx (fp32, manifest cache) -> export.tensorrt.prepare_onnx
(constant folding + shape inference) -> build_engine (profile from the descriptor and ``shape_config``,
precision from the config; SDXL VAE stays fp32) -> TensorRTEngine on torch's current CUDA stream.
Inputs: torch CUDA tensors (numpy accepted); outputs: float32 torch CUDA tensors.

LoRA (:meth:`TensorRTBackend.set_patch`): the engines are built refittable; a new LoRA set refits each built
engine of a touched source from its prepared ONNX (the base weights) plus the patched tensors by initializer
name (``Refitter.set_named_weights``; the names come from the export manifest's parameter map). No rebuild.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from engine.backends.base import Array, ComponentsMixin
from engine.config import EngineConfig
from core.errors import BackendUnavailable
from engine.networks.lora import patched_tensors
from export.descriptors import ShapeConfig, source_of
from export.onnx import SourceWeights, export_component
from export import tensorrt as trt_export  # by module: its functions are looked up at call time (tests patch them)

log = logging.getLogger(__name__)


class TensorRTBackend(ComponentsMixin):
    def __init__(self, config: EngineConfig, components: Mapping[str, Any], model_hash: str, *,
                 shape_config=None, progress=None, refittable: bool = True):
        trt_export.import_tensorrt()  # MissingDependency naming the 'tensorrt' extra
        if not config.device.startswith("cuda"):
            raise BackendUnavailable(f"the TensorRT backend needs a CUDA device, got device={config.device!r}")
        self._init_components(components)
        self.config = config
        self.model_hash = model_hash
        self.shape_config = shape_config or ShapeConfig()
        self.progress = progress
        self.refittable = refittable
        self._engines: dict[str, Any] = {}
        self._prepared_arts: dict[str, Any] = {}
        self._patch = None  # engine.networks.lora.WeightPatch
        self._applied: dict[str, str] = {}  # component -> patch key its engine carries

    def _prepared(self, component: str, components: Mapping[str, Any], model_hash: str):
        # full attention: TensorRT fuses MatMul-Softmax-MatMul into its own flash kernel (chunks would split it)
        art = export_component(component, components, model_hash, self.config.artefacts_dir, precision="fp32",
                               progress=self.progress, attention_chunks=0)
        return trt_export.prepare_onnx(art, progress=self.progress)

    def engine(self, component: str):
        if component not in self._engines:
            self.descriptor(component)  # InvalidRequest if the model lacks it
            prepared = self._prepared(component, self._components, self.model_hash)
            self._prepared_arts[component] = prepared
            plan = trt_export.build_engine(prepared, self.shape_config, self.config.precision.value,
                                           self.config.artefacts_dir, device=self.config.device,
                                           refittable=self.refittable, progress=self.progress)
            self._engines[component] = trt_export.TensorRTEngine(plan, self.config.device)
            self._applied[component] = ""
            self._refit_patch(component)
        return self._engines[component]

    def set_patch(self, patch) -> None:
        """Carry ``patch`` (engine.networks.lora.WeightPatch): refits the built engines whose source it changes."""
        self._patch = patch
        for component in list(self._engines):
            self._refit_patch(component)

    def patched_weights(self, component: str) -> dict[str, Any]:
        """Initializer name -> patched numpy array of the current patch for ``component``'s prepared graph."""
        # base weights from the prepared graph's fp32 stage (the torch weights are not needed)
        base = SourceWeights(self._prepared_arts[component])
        return dict(patched_tensors(self._patch, source_of(component), base, f"{component} (TensorRT refit)"))

    def _refit_patch(self, component: str) -> None:
        key = self._patch.key(source_of(component)) if self._patch is not None else ""
        if self._applied.get(component, "") == key:
            return
        # base weights from the prepared graph, then the patched ones (an empty patch restores the base)
        named = self.patched_weights(component) if key else {}
        self._engines[component].refit(self._prepared_arts[component].path, named)
        self._applied[component] = key
        log.info("%s: TensorRT engine refitted for LoRA patch %s (%d tensors)", component, key or "none",
                 len(named))

    def refit(self, component: str, components: Mapping[str, Any], model_hash: str) -> None:
        """Swap in the weights of another model of the same architecture without rebuilding the engine."""
        prepared = self._prepared(component, components, model_hash)
        self.engine(component).refit(prepared.path)
        self._components = {**self._components, **components}
        self._descriptors.pop(component, None)

    def run(self, component: str, feeds: Mapping[str, Array]) -> dict[str, Array]:
        desc = self.descriptor(component)
        self._check_feeds(desc, feeds)
        trt_export.check_in_profile(desc.profile(self.shape_config), {n: tuple(v.shape) for n, v in feeds.items()})
        return self.engine(component).run(feeds)
