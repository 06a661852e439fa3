"""The backend protocol and the factory.

A backend runs named components (export.descriptors) on named arrays::

    outputs = backend.run("unet", {"sample": x, "timestep": t, "encoder_hidden_states": c})
    outputs["model_output"]

Arrays are numpy on CPU backends and torch tensors on CUDA backends; a backend casts inputs to its graph
dtypes and returns float32 outputs. Buffers, IO binding and CUDA graphs stay inside the backend.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Protocol, runtime_checkable

from engine.config import BackendKind
from engine.config import EngineConfig
from core.errors import InvalidRequest

Array = Any  # numpy.ndarray or torch.Tensor


@runtime_checkable
class Backend(Protocol):
    def run(self, component: str, feeds: Mapping[str, Array]) -> dict[str, Array]: ...

    def has(self, component: str) -> bool: ...


# backend kind -> "module:class"; each class takes (config, components, model_hash, **options)
BACKENDS: dict[BackendKind, str] = {
    BackendKind.TORCH: "engine.backends.torch:TorchBackend",
    BackendKind.ONNXRUNTIME: "engine.backends.onnxruntime:OnnxRuntimeBackend",
    BackendKind.OPENVINO: "engine.backends.openvino:OpenVinoBackend",
    BackendKind.TENSORRT: "engine.backends.tensorrt:TensorRTBackend",
}


# backends that run exported graphs and free the torch weights they were handed (engine.backends.weights); their
# LoRA merges read the base weights from the artefacts (export.onnx.SourceWeights). Not TensorRT: its refit of
# another model (TensorRTBackend.refit) exports from modules.
RELEASES_WEIGHTS = frozenset({BackendKind.ONNXRUNTIME, BackendKind.OPENVINO})


def create_backend(config: EngineConfig, components: Mapping[str, Any], model_hash: str, *, owned: bool = False,
                   **options) -> Backend:
    """The backend ``config.backend`` over the diffusers ``components`` of one model (hash ``model_hash``).

    ``options`` go to the backend class (e.g. ``progress`` callback for on-demand exports, ``cuda_graph``).
    ``owned=True``: the caller hands the modules over (nothing else runs them), so a backend in
    :data:`RELEASES_WEIGHTS` frees their torch weights once exported. Construction is cheap: sessions/engines
    are created (and exported through the manifest cache) lazily, on the first ``run`` of each component.
    """
    if owned and config.backend in RELEASES_WEIGHTS:
        options["release_weights"] = True
    module, cls = BACKENDS[config.backend].split(":")
    return getattr(importlib.import_module(module), cls)(config, components, model_hash, **options)


class ComponentsMixin:
    """Shared bookkeeping: which components the modules provide and their descriptors (cached)."""

    def _init_components(self, components: Mapping[str, Any]) -> None:
        self._components = dict(components)
        self._descriptors: dict = {}

    def has(self, component: str) -> bool:
        from export.descriptors import SOURCES

        return SOURCES.get(component) in self._components

    def descriptor(self, component: str):
        """The export.descriptors.ComponentDescriptor of ``component`` (names, shapes, latent multiple)."""
        from export.descriptors import describe

        if component not in self._descriptors:
            self._descriptors[component] = describe(component, self._components)
        return self._descriptors[component]

    def _check_feeds(self, desc, feeds: Mapping[str, Array]) -> None:
        names = desc.input_names
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            field = (missing or extra)[0]
            what = "missing" if missing else "unexpected"
            raise InvalidRequest(f"{desc.component}.{field}", f"{what} input", ", ".join(names))
