"""Torch weights a non-torch backend does not run: exported, then released.

A runtime that runs exported graphs (onnxruntime, openvino) holds its own copy of the weights; the torch
modules it was handed are only needed to export. With ``release_weights=True`` (set by
``create_backend(..., owned=True)``: the Engine's choice, it owns the loaded model) the backend, before
creating its first session from a source module, makes sure every ONNX artefact made from that module exists (``unet`` and ``unet_control`` from the UNet, ``vae_decoder`` and
``vae_encoder`` from the VAE), then frees the module's weights (:func:`export.onnx.release_weights`): from
then on only the runtime's copy is resident. Backends built directly on shared modules (tests, benchmarks)
keep them by default.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def export_siblings_and_release(backend, component: str) -> None:
    """Export every component ``backend`` can make from ``component``'s source module, then release it."""
    from export.descriptors import SOURCES
    from export.onnx import is_released, release_weights

    source = SOURCES[component]
    module = backend._components.get(source)
    if module is None or is_released(module) or not hasattr(module, "parameters"):
        return
    for sibling, src in SOURCES.items():
        if src == source and backend.has(sibling):
            backend.artefact(sibling)
    release_weights(module)
    log.info("%s: torch weights released (the %s runtime holds its own copy)", source, backend.config.backend.value)
