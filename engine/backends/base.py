"""The backend protocol and what every backend shares (the factory: engine.backends).

A backend runs named components (export.descriptors) on named arrays::

    outputs = backend.run("unet", {"sample": x, "timestep": t, "encoder_hidden_states": c})
    outputs["model_output"]

Arrays are numpy on CPU backends and torch tensors on CUDA backends; a backend casts inputs to its graph
dtypes and returns float32 outputs. Buffers, IO binding and CUDA graphs stay inside the backend.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

from core.errors import InvalidRequest
from export.descriptors import describe, source_of

Array = Any  # numpy.ndarray or torch.Tensor


@runtime_checkable
class Backend(Protocol):
    def run(self, component: str, feeds: Mapping[str, Array]) -> dict[str, Array]: ...

    def has(self, component: str) -> bool: ...


class ComponentsMixin:
    """Shared bookkeeping: which components the modules provide and their descriptors (cached)."""

    def _init_components(self, components: Mapping[str, Any]) -> None:
        self._components = dict(components)
        self._descriptors: dict = {}

    def has(self, component: str) -> bool:
        return source_of(component) in self._components

    def descriptor(self, component: str):
        """The export.descriptors.ComponentDescriptor of ``component`` (names, shapes, latent multiple)."""
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
