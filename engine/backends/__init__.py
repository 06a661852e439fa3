"""Runtimes that run exported components: torch (the reference), onnxruntime, openvino, TensorRT; the factory.

The protocol and the bookkeeping every backend shares are in base.py; each runtime is a module of its own,
imported by :func:`create_backend` when its kind is asked for (``BACKENDS``: "module:class")."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from engine.backends.base import Backend
from engine.config import BackendKind, EngineConfig

__all__ = ["BACKENDS", "RELEASES_WEIGHTS", "Backend", "create_backend"]

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
