"""Modules known by their configs, built on first use: a load from cache without diffusers or transformers.

A backend that runs exported graphs (onnxruntime, openvino) needs, from a model whose artefacts are all
cached, only what the modules' configs say (descriptors, model family, clip skip, embedding widths). Building
the diffusers / transformers modules, even on the meta device, costs their imports (~3 s of a 5 s load on the
CPU machine, and ~200 MB of resident memory). So the model store keeps a *module card* per checkpoint
(:func:`write_card`, written whenever it builds the real modules): each component's library, class and full
config, and which of a few probed attributes it has. A later load without weights
(``ModelStore.load_model(meta=True)``) answers each component with a :class:`DeferredModule` made from the
card: its ``config`` is the card's (attribute and dict access, as diffusers' ``FrozenDict`` and transformers'
``PretrainedConfig`` give), and anything else (parameters, methods, an attribute the card lacks) builds the
real modules on the meta device -- the same build as without a card -- and forwards to them from then on.
Attributes set before the build (the released-weights marks of export.onnx) are kept and handed over.

A card is used only when its format, the file's sha256, the dtype and the diffusers / transformers versions
match; otherwise the store builds the real modules and writes a new card.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from core.atomic import atomic_file


log = logging.getLogger(__name__)

CARD_FORMAT = 1
# attributes whose presence callers test (export.onnx: attention processors; export.descriptors / wrappers:
# a text encoder's projection): the card records them, so ``has_attribute`` needs no build
PROBED = ("set_attn_processor", "text_projection")
MARK_PREFIX = "_sdengine_"  # attributes the engine sets on modules (export.onnx RELEASED, LOADER)
_OWN = ("_card", "_build", "_lock", "_module", "_pending", "_key")


class DeferredConfig(dict):
    """A module's full config from its card: ``cfg.key`` and ``cfg["key"]``; a key the card lacks is read from
    the real module's config (which builds it)."""

    def __init__(self, data: Mapping, owner: "DeferredModule"):
        super().__init__(data)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._owner._materialize(f"config.{name}").config, name)

    def to_dict(self) -> dict:
        return dict(self)


class DeferredModule:
    """One component module of a card: ``config`` without a build, anything else through the real module."""

    def __init__(self, key: str, card: Mapping, build: Callable[[], Any]):
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_card", dict(card))
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_module", None)
        object.__setattr__(self, "_pending", {})
        object.__setattr__(self, "config", DeferredConfig(card["config"], self))

    @property
    def built(self) -> bool:
        return self._module is not None

    def _materialize(self, why: str):
        with self._lock:
            if self._module is None:
                log.info("%s: building the %s module (needed for %r)", self._key, self._card["class"], why)
                module = self._build()
                for name, value in self._pending.items():
                    setattr(module, name, value)
                self._pending.clear()
                object.__setattr__(self, "_module", module)
                object.__setattr__(self, "config", getattr(module, "config", self.config))
            return self._module

    def __getattr__(self, name: str):
        # only called for what the proxy itself lacks
        if name.startswith("__") or name in _OWN:
            raise AttributeError(name)
        pending = object.__getattribute__(self, "_pending")
        if name in pending:
            return pending[name]
        if self._module is None and (name.startswith(MARK_PREFIX)
                                     or (name in PROBED and name not in self._card.get("attrs", ()))):
            # a mark not set (export.onnx's released-weights marks), or an attribute the card says the class
            # lacks: no build to learn that
            raise AttributeError(name)
        return getattr(self._materialize(name), name)

    def __setattr__(self, name: str, value) -> None:
        if self._module is None:
            self._pending[name] = value
        else:
            setattr(self._module, name, value)

    def __delattr__(self, name: str) -> None:
        if self._module is None:
            if name not in self._pending:
                raise AttributeError(name)
            del self._pending[name]
        else:
            delattr(self._module, name)

    def __call__(self, *args, **kwargs):
        return self._materialize("__call__")(*args, **kwargs)

    def __repr__(self) -> str:
        state = "built" if self._module is not None else "not built"
        return f"<DeferredModule {self._key}: {self._card['class']} ({state})>"


def real_module(module):
    """The module itself: a :class:`DeferredModule` is built (once) and its real module returned."""
    if isinstance(module, DeferredModule):
        return module._materialize("the module itself")
    return module


def has_attribute(module, name: str) -> bool:
    """``hasattr(module, name)``, answered from the card for a :class:`DeferredModule` not built yet (``name``
    one of :data:`PROBED`)."""
    if isinstance(module, DeferredModule) and not module.built and name in PROBED:
        return name in module._card.get("attrs", ())
    return hasattr(module, name)


# ------------------------------------------------------------------------------------------------ cards
def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def _config_dict(module) -> dict:
    config = module.config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=_json_default))


def _json_default(value):
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def card_of(modules: Mapping[str, Any], sha256: str, dtype) -> dict:
    """The card of built ``modules`` (those with a config; tokenizers are not modules)."""
    components = {}
    for key, module in modules.items():
        module = module._module if isinstance(module, DeferredModule) else module
        if module is None or not hasattr(module, "config") or not hasattr(module, "parameters"):
            continue
        components[key] = {"class": type(module).__name__, "library": type(module).__module__.split(".")[0],
                           "config": _config_dict(module), "attrs": [a for a in PROBED if hasattr(module, a)]}
    return {"format": CARD_FORMAT, "sha256": sha256, "dtype": str(dtype), "versions": _library_versions(),
            "components": components}


def card_path(cards_dir: Path, sha256: str, dtype) -> Path:
    return Path(cards_dir) / f"{sha256}-{str(dtype).replace('torch.', '')}.json"


def write_card(cards_dir: Path | None, modules: Mapping[str, Any], sha256: str, dtype) -> None:
    """Write the card of ``modules`` (atomically; a read-only store just loads slower next time)."""
    if cards_dir is None or not sha256:
        return
    path = card_path(cards_dir, sha256, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w", encoding="utf-8") as f:
            json.dump(card_of(modules, sha256, dtype), f)
    except OSError as exc:
        log.warning("cannot write the module card %s: %s", path, exc)


def read_card(cards_dir: Path | None, sha256: str, dtype, needed) -> dict | None:
    """The card for this file and dtype, if it is current (format, sha256, library versions) and holds every
    ``needed`` component; else None."""
    if cards_dir is None or not sha256:
        return None
    path = card_path(cards_dir, sha256, dtype)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or card.get("sha256") != sha256 \
            or card.get("dtype") != str(dtype) or card.get("versions") != _library_versions():
        return None
    components = card.get("components")
    if not isinstance(components, dict) or any(not isinstance(components.get(k), dict) for k in needed):
        return None
    return card


def deferred_components(card: Mapping, build_all: Callable[[], Mapping[str, Any]], name: str) -> dict:
    """One :class:`DeferredModule` per component of ``card``; the first one used calls ``build_all()`` (the real
    modules of every component, built once) and each takes its own from the result."""
    lock = threading.Lock()
    built: dict = {}

    def builder(key: str):
        def build():
            with lock:
                if not built:
                    built.update(build_all())
            return built[key]
        return build

    return {key: DeferredModule(f"{name}/{key}", entry, builder(key))
            for key, entry in card["components"].items()}
