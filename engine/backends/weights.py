"""Torch weights a non-torch backend does not run: exported, then released.

A runtime that runs exported graphs (onnxruntime, openvino) holds its own copy of the weights; the torch
modules it was handed are only needed to export. With ``release_weights=True`` (set by
``create_backend(..., owned=True)``: the Engine's choice, it owns the loaded model) the backend, before
creating its first session from a source module, frees the module's weights (:func:`export.onnx.release_weights`)
once that component's artefact exists: from then on only the runtime's copy is resident. The other components of
the module (``unet_control`` beside ``unet``, ``vae_encoder`` beside ``vae_decoder``, the on-demand variants of
``export.descriptors.VARIANTS``) are exported on their first use, the weights loaded back through the module's
loader (the Engine's ``weights_loader``) and released again: a txt2img exports only what it runs. A backend
without a loader exports every sibling before the release. Backends built directly on shared modules (tests, benchmarks)
keep them by default.

The other way round (:func:`adopt_cached`): a model loaded without its weights (``load_checkpoint(meta=True)``:
modules from the safetensors headers, on the meta device) runs on such a backend when the backend's cache holds
an artefact made from each module; the modules are marked released with their artefacts' weights
fingerprint, and a sibling never exported yet (``unet_control`` before the first ControlNet request) is exported
on its first use through the loader. A load from cache then reads no weights into torch at all. Where an artefact
is missing, the module is marked unloaded: its export loads its weights (that module's only, read from the
checkpoint) and they are released after it, so a cold start never holds two modules' torch weights at once.
"""

from __future__ import annotations

import functools
import logging

from export.descriptors import SOURCES, VARIANTS, on_demand, source_of
from export.onnx import LOADER, is_released, is_unloaded, mark_released, mark_unloaded, release_weights


log = logging.getLogger(__name__)

# what every generation runs (txt2img and img2img alike): exported ahead on a cold start (export_ahead)
FIRST_RUN = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


def _plain(backend, source: str) -> list[str]:
    """The components (not the on-demand variants) ``backend`` makes from the module ``source``."""
    return [c for c, src in SOURCES.items() if src == source and c not in VARIANTS and backend.has(c)]


def _release(backend, source: str, module) -> None:
    release_weights(module)
    loader = getattr(backend, "weights_loader", None)  # the Engine's way back (an on-demand variant's export)
    if loader is not None and getattr(module, LOADER, None) is None:
        setattr(module, LOADER, functools.partial(loader, source))  # this module's weights only
    log.info("%s: torch weights released (the %s runtime holds its own copy)", source, backend.config.backend.value)


def export_siblings_and_release(backend, component: str) -> None:
    """``component``'s artefact exists (the caller made it): release its source module's weights. With a way
    back (the Engine's ``weights_loader``) nothing else is exported: a sibling (``unet_control``, ``vae_encoder``)
    is exported on its first use, its weights loaded back for it, so a txt2img exports only what it runs.
    Without one, every sibling is exported first (nothing could make it later)."""
    source = source_of(component)
    module = backend._components.get(source)
    if module is None or is_released(module) or is_unloaded(module) or not hasattr(module, "parameters"):
        return
    if getattr(backend, "weights_loader", None) is not None:
        _release(backend, source, module)
        # the loader put every module's weights back (an on-demand export): release the others already exported
        for other, mod in backend._components.items():
            plain = _plain(backend, other) if other in SOURCES.values() else []
            if mod is module or not plain or is_released(mod) or is_unloaded(mod) or not hasattr(mod, "parameters"):
                continue
            if any(backend.cached_fingerprint(c) is not None for c in plain):
                _release(backend, other, mod)
        return
    siblings = _plain(backend, source)
    if on_demand(component) and any(backend.cached_fingerprint(c) is None for c in siblings):
        return  # a variant first (tiling): its siblings are exported, and the weights released, by their own first use
    for sibling in siblings:
        backend.artefact(sibling)
    _release(backend, source, module)
    if on_demand(component):
        # the loader put every module's weights back for this export: release the others whose artefacts all exist
        for other, mod in backend._components.items():
            plain = _plain(backend, other) if other in SOURCES.values() else []
            if mod is module or not plain or is_released(mod) or is_unloaded(mod) or not hasattr(mod, "parameters"):
                continue
            if all(backend.cached_fingerprint(c) is not None for c in plain):
                _release(backend, other, mod)


def adopt_cached(backend, components, load_weights) -> bool:
    """Modules built without weights (``components`` of a ``meta=True`` load) on ``backend``. ``load_weights(*sources)``
    loads the weights of the named modules (only those) into them. Each module whose every artefact is in the
    backend's cache (``backend.cached_fingerprint``) is marked released with its artefacts' weights fingerprint,
    ``load_weights(source)`` as its way back for a later export; each other module is marked unloaded
    (export.onnx.mark_unloaded): its weights are loaded by its first export, and released after it, so a cold
    start holds one module's torch weights at a time. Answers whether every module was cached."""
    fingerprints: dict[str, str] = {}
    stale: set[str] = set()
    for component, source in SOURCES.items():
        if source not in components or component in VARIANTS or not backend.has(component):
            continue
        fingerprint = backend.cached_fingerprint(component)
        if fingerprint is None:
            continue  # never used yet (unet_control, vae_encoder): exported on first use, through load_weights
        if fingerprints.setdefault(source, fingerprint) != fingerprint:
            log.info("%s: cached from other weights; its module's weights are loaded to export it", component)
            stale.add(source)
    missing = sorted(source for source in components if source in SOURCES.values()
                     and (source not in fingerprints or source in stale)
                     and any(backend.has(c) for c in _plain(backend, source)))
    for source in missing:
        mark_unloaded(components[source], functools.partial(load_weights, source))
    for source, fingerprint in fingerprints.items():
        if source not in missing:
            mark_released(components[source], fingerprint, functools.partial(load_weights, source))
    if missing:
        log.info("%s: not in the artefact cache; each module's weights are loaded by its export", ", ".join(missing))
        return False
    log.info("every artefact cached: %s run without loading their torch weights", ", ".join(sorted(fingerprints)))
    return True


def export_ahead(backend, components=FIRST_RUN) -> None:
    """Export each of ``components`` that ``backend`` has and is not cached yet, releasing its module's weights after
    it, before anything is compiled: on a cold start no compiled model (nor session) is resident while the next
    module's weights are mapped and exported (the exporter reads them all at once, beside its own copies), so the
    peak is one export's, not one export's plus the runtime's models of the modules before it."""
    for component in components:
        if backend.has(component) and backend.cached_fingerprint(component) is None:
            backend.artefact(component)
            export_siblings_and_release(backend, component)
